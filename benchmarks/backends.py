"""FSDP2 vs DeepSpeed ZeRO-1/2/3: step time and memory per rank, side by side on the same 2-rank CPU setup.

Each backend trains the same model (benchmarks/trainer_overhead.py's setup: ViT-S/16 student @128 px, batch 8 per
rank, one group with the smoke recipe's tiny CLIP, DINOv2 and the real EfficientNet-Lite0 teacher) for --steps
steps in a fresh 2-process torchrun job (gloo, one torch thread per rank), fed the same batches from the stage's
own stream. Per rank: median step time after 2 warm-up steps, the bytes of model + gradient + optimizer state the
rank holds after a step (its own shards/partitions: what ZeRO stages trade), and the process's peak RSS
(teachers, activations and runtime included, so it moves less). Backends run in turn, --repeats rounds, medians.

    python benchmarks/backends.py [--steps 8] [--repeats 1] [--backends fsdp2,zero1,zero2,zero3]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BACKENDS = {
    "fsdp2": [],
    "zero1": ["distributed_backend=deepspeed", "deepspeed.zero_stage=1"],
    "zero2": ["distributed_backend=deepspeed", "deepspeed.zero_stage=2"],
    "zero3": ["distributed_backend=deepspeed", "deepspeed.zero_stage=3"],
}


def _state_bytes(trainer) -> int:
    """Bytes of parameters, gradients and optimizer state this rank holds (its shards / partitions)."""
    import torch

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            t = t._local_tensor if hasattr(t, "_local_tensor") else t
            if t.numel() and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()

    for p in trainer.model.parameters():
        add(p.data if not hasattr(p, "ds_tensor") else p.ds_tensor)
        add(p.grad)
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)
    for group in inner.param_groups:
        for p in group["params"]:
            add(p)
            add(p.grad)
    for st in inner.state.values():
        for v in st.values():
            add(v)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "averaged_gradients"):
        obj = getattr(opt, name, None)
        vals = obj.values() if isinstance(obj, dict) else (obj or [])
        for v in vals:
            for t in (v if isinstance(v, (list, tuple)) else [v]):
                add(t)
    return total


def worker(args) -> None:
    """One torchrun rank: build the trainer for one backend, time --steps steps, write this rank's figures."""
    import torch

    from radio_scale.config import load_config
    from radio_scale.distributed.env import init_distributed, shutdown
    from radio_scale.train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config("smoke", [*args.base, *BACKENDS[args.backend]])
    env = init_distributed(device="cpu")
    trainer = Trainer(cfg, env, Path(args.run_dir))
    trainer._enter_stage(0)
    group = trainer.stage.groups[0].name
    batches = [next(trainer._iters[group]) for _ in range(args.steps + 2)]
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        trainer.train_step({group: batch})
        trainer.step += 1
        if i >= 2:
            times.append(time.perf_counter() - t0)
    out = {"rank": env.rank, "step_s": statistics.median(times), "state_bytes": _state_bytes(trainer),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    Path(args.out).with_suffix(f".rank{env.rank}.json").write_text(json.dumps(out))
    trainer.checkpointer.close()
    trainer.stage.close()
    shutdown()


def base_overrides(args) -> list[str]:
    """trainer_overhead.bench_config's recipe as overrides (each rank builds it, plus its backend's keys)."""
    names = [t for t in args.teachers.split(",") if t]
    return [f"student.arch={args.arch}", "student.embed_dim=null", "student.depth=null", "student.num_heads=null",
            "student.window_sizes=[0]", "student.global_blocks=[]",
            f"stages.0.groups.0.resolution={args.res}", f"stages.0.groups.0.batch_per_rank={args.batch}",
            f"stages.0.groups.0.teachers=[{','.join(names)}]", "data.num_workers=0",
            "tracking.system_metrics=false", "tracking.log_every=10"]


def run_backend(name: str, args, tmp: Path) -> list[dict]:
    out = tmp / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           "--worker", "--backend", name, "--out", str(out), "--run-dir", str(tmp / f"run_{name}"),
           "--steps", str(args.steps), "--arch", args.arch, "--res", str(args.res), "--batch", str(args.batch),
           "--teachers", args.teachers, "--base", *base_overrides(args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", RADIO_THREADS_PER_RANK="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{r.stderr[-4000:]}")
    return [json.loads(out.with_suffix(f".rank{i}.json").read_text()) for i in range(2)]


def main(argv=None) -> int:
    from trainer_overhead import add_setup_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(ap)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--backends", default="fsdp2,zero1,zero2,zero3")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="fsdp2", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--base", nargs="*", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    names = [b for b in args.backends.split(",") if b]
    results: dict[str, list[list[dict]]] = {n: [] for n in names}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="backends_") as tmp:
        for rep in range(args.repeats):
            for n in names:  # in turn, so load changes hit every backend alike
                results[n].append(run_backend(n, args, Path(tmp) / f"r{rep}"))
                print(f"round {rep} {n}: " + ", ".join(f"rank {r['rank']} {r['step_s']:.2f} s/step" for r in results[n][-1]),
                      flush=True)
    base = statistics.median(r["step_s"] for rs in results[names[0]] for r in rs)
    print(f"\n{args.arch} @{args.res}px, batch {args.batch} per rank, 2 ranks (gloo, 1 thread each), {args.steps} steps, "
          f"{args.repeats} round(s); load average {load:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    print("| backend | step s (median over ranks) | vs fsdp2 | model+grad+optimizer state MB per rank | peak RSS MB per rank |")
    print("|---|---|---|---|---|")
    for n in names:
        flat = [r for rs in results[n] for r in rs]
        step = statistics.median(r["step_s"] for r in flat)
        state = statistics.median(r["state_bytes"] for r in flat) / 2**20
        rss = statistics.median(r["peak_rss_bytes"] for r in flat) / 2**20
        print(f"| {n} | {step:.2f} | {step / base:.2f}x | {state:.0f} | {rss:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
