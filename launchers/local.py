"""Local launch: N rank processes on this machine under torchrun (a dead rank stops the others at once)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from radio_scale.launchers.cluster import ClusterConfig


def local_command(nprocs: int, config_path: Path, run_dir: Path) -> list[str]:
    """The torchrun command line that starts every rank of the run."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc-per-node", str(nprocs), "--max-restarts", "0",
        "-m", "radio_scale.train.entry", "--recipe", str(config_path), "--run-dir", str(run_dir),
    ]


def local_env(cluster: ClusterConfig) -> dict:
    """Environment for the ranks: one intra-op thread per rank on CPU so ranks don't oversubscribe cores."""
    env = dict(os.environ)
    env.update({k: str(v) for k, v in cluster.env.items()})
    threads = cluster.threads_per_rank or max(1, (os.cpu_count() or 2) // max(1, cluster.tasks_per_node))
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["RADIO_THREADS_PER_RANK"] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if cluster.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def launch(cluster: ClusterConfig, nprocs: int, config_path: Path, run_dir: Path) -> int:
    """Run all ranks to completion here; returns torchrun's exit code. SIGTERM/SIGINT reach the ranks."""
    proc = subprocess.Popen(local_command(nprocs, config_path, run_dir), env=local_env(cluster))

    def forward(signum, frame):  # let the ranks save and stop at the next step boundary
        proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
