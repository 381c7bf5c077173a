"""Rank entry point: runs under torchrun, under a SLURM allocation (srun/submitit), or as one process."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from radio_scale.config import ConfigError, RunConfig, load_config

EXIT_PREEMPTED = 124  # the job saved a checkpoint on a preemption signal and should be requeued


def default_run_dir(cfg: RunConfig) -> Path:
    """runs/<name> unless the config names one."""
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / cfg.name


def run_rank(cfg: RunConfig, run_dir: Path, on_preempted=None, on_hang=None, device: str = "auto") -> str:
    """Initialise this rank's process group, train, tear down; returns 'finished' or 'preempted'.

    on_preempted: called on rank 0 after the preemption checkpoint, while every rank still waits (e.g. requeue).
    on_hang: called by the watchdog of a hung rank before it exits non-zero (e.g. requeue).
    device: the cluster file's `device` (auto | cpu | cuda); with cuda a rank without a usable GPU refuses to start.
    """
    import torch

    from radio_scale.distributed.env import init_distributed, shutdown
    from radio_scale.train.trainer import Trainer

    torch.set_num_threads(max(1, int(os.environ.get("RADIO_THREADS_PER_RANK", torch.get_num_threads()))))
    env = init_distributed(timeout_s=cfg.monitor.collective_timeout_s, device=device)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        status = Trainer(cfg, env, run_dir, on_hang=on_hang).run()
        if status == "preempted" and on_preempted is not None:
            if env.is_main:
                on_preempted()
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
        return status
    finally:
        shutdown()


def main(argv=None) -> int:
    """radio-train --recipe R [--run-dir D] [key=value ...] (one rank; launch with torchrun or srun)."""
    p = argparse.ArgumentParser(prog="radio-train", description=main.__doc__)
    p.add_argument("--recipe", required=True)
    p.add_argument("--run-dir", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.recipe, args.overrides, check_files=True)
    except ConfigError as e:
        print(f"radio-train: {e}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    status = run_rank(cfg, run_dir)
    return EXIT_PREEMPTED if status == "preempted" else 0


if __name__ == "__main__":
    sys.exit(main())
