"""Run under torchrun (2 gloo ranks): what a multi-rank run hits first, on the real Trainer; one JSON per rank.

balancers: a few steps with each loss balancer (naive, uncertainty, adaloss) at world size 2 (FSDP2-sharded
    balancer parameters); reports every step's weights and the balancer's full parameters on this rank.
eval_bf16: precision=bf16, one step, then the periodic evaluation (eval.every), then one more step.
teacher_units: the smoke recipe's tiny teachers (open_clip, timm DINOv2, SAM) sharded with FSDP2 over both
    ranks; reports how many FSDP units each became and checks a sharded forward equals the unsharded one.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from radio_scale.config import load_config
from radio_scale.distributed.env import init_distributed, shutdown
from radio_scale.monitoring.watchdog import Watchdog
from radio_scale.train.trainer import Trainer

TINY = ["data.num_workers=0", "stages.0.groups.0.batch_per_rank=2", "stages.0.groups.0.teachers=[clip, dino]"]


def _full(t: torch.Tensor) -> list:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().flatten().tolist()


def balancers(env, run_dir: Path) -> dict:
    out = {}
    for kind in ("naive", "uncertainty", "adaloss"):
        cfg = load_config("smoke", [*TINY, f"loss.balancer={kind}", "optim.lr=0.05", "stages.0.warmup_steps=0"])
        trainer = Trainer(cfg, env, run_dir / kind)
        trainer._enter_stage(0)
        steps = []
        for _ in range(3):
            stats = trainer.train_step()
            trainer.step += 1
            steps.append({"finite": stats.finite, "loss": stats.loss, "weights": stats.weights})
        bal = trainer.model.balancer
        out[kind] = {"steps": steps, "params": {n: _full(p) for n, p in bal.named_parameters()},
                     "buffers": {n: _full(b) for n, b in bal.named_buffers()}}
        trainer.stage.close()
    return out


def eval_bf16(env, run_dir: Path) -> dict:
    cfg = load_config("smoke", [*TINY, "precision=bf16", "eval.every=1",
                                "eval.datasets=[digits]"])
    trainer = Trainer(cfg, env, run_dir / "eval_bf16")
    trainer.tracker.start()  # rank 0 logs the evaluation (the others hold a disabled tracker)
    trainer.watchdog = Watchdog(trainer.run_dir, env.rank, {"startup": 300, "train": 300, "checkpoint": 300},
                                exit_code=None, initial_phase="train")  # as Trainer.run sets it up
    trainer._enter_stage(0)
    stats = trainer.train_step()
    trainer.step += 1
    trainer._periodic_eval()  # what Trainer.run calls every eval.every steps
    records = []
    path = run_dir / "eval_bf16" / "eval.jsonl"
    if env.rank == 0:
        records = [json.loads(line) for line in path.read_text().splitlines()]
    stats2 = trainer.train_step()  # training goes on after the evaluation (FSDP state intact)
    trainer.stage.close()
    trainer.watchdog.stop()
    trainer.tracker.end()
    return {"finite": [stats.finite, stats2.finite], "weights": stats.weights, "eval": records}


def teacher_units(env, run_dir: Path) -> dict:
    from torch.distributed.fsdp import FSDPModule

    from radio_scale.distributed.parallel import shard_teacher
    from radio_scale.teachers import build_teacher

    cfg = load_config("smoke")
    group = dist.new_group([0, 1])
    out = {}
    for name in ("clip", "dino", "sam"):
        tc = cfg.teacher(name)
        ref = build_teacher(tc)
        sharded = shard_teacher(build_teacher(tc), "fsdp", group, torch.device("cpu"), "fp32")
        units = [n for n, m in sharded.named_modules() if isinstance(m, FSDPModule)]
        torch.manual_seed(1)
        x = torch.randn(2, 3, tc.input_size, tc.input_size)
        with torch.no_grad():
            a, b = ref(x), sharded(x)
        diff = float((a.spatial - b.spatial).abs().max())
        if a.summary is not None:
            diff = max(diff, float((a.summary - b.summary).abs().max()))
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in sharded.parameters())
        out[name] = {"units": units, "max_abs_diff": diff, "local_params": local,
                     "params": sum(p.numel() for p in ref.parameters())}
    return out


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    env = init_distributed(timeout_s=300)
    try:
        report = {"balancers": balancers, "eval_bf16": eval_bf16, "teacher_units": teacher_units}[mode](env, out_dir)
    finally:
        shutdown()
    (out_dir / f"{mode}_rank{env.rank}.json").write_text(json.dumps(report))
