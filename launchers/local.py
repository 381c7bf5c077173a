"""Local launch: N rank processes on this machine under torchrun (a dead rank stops the others at once).

A local run listens on loopback only: torchrun's stores are bound to 127.0.0.1
(radio_scale.launchers.loopback_torchrun), the ranks find them there (--local-addr 127.0.0.1), and gloo's
sockets are put on the loopback interface (GLOO_SOCKET_IFNAME, unless already set). NCCL chooses its own
bootstrap interface (NCCL_SOCKET_IFNAME in the cluster file's env sets it).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

from radio_scale.launchers.cluster import ClusterConfig


def local_command(nprocs: int, config_path: Path, run_dir: Path) -> list[str]:
    """The torchrun command line that starts every rank of the run (rendezvous and stores on 127.0.0.1 only)."""
    return [
        sys.executable, "-m", "radio_scale.launchers.loopback_torchrun",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--local-addr", "127.0.0.1",
        "--nnodes", "1", "--nproc-per-node", str(nprocs), "--max-restarts", "0",
        "-m", "radio_scale.train.entry", "--recipe", str(config_path), "--run-dir", str(run_dir),
    ]


def loopback_interface() -> Optional[str]:
    """The name of the network interface that holds 127.0.0.1 (lo on Linux, lo0 on macOS), or None."""
    try:
        import psutil

        for name, addrs in psutil.net_if_addrs().items():
            if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addrs):
                return name
    except Exception:
        pass
    return None


def local_env(cluster: ClusterConfig) -> dict:
    """Environment for the ranks: one intra-op thread per rank on CPU so ranks don't oversubscribe cores."""
    env = dict(os.environ)
    env.update({k: str(v) for k, v in cluster.env.items()})
    threads = cluster.threads_per_rank or max(1, (os.cpu_count() or 2) // max(1, cluster.tasks_per_node))
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["RADIO_THREADS_PER_RANK"] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    lo = loopback_interface()
    if lo and "GLOO_SOCKET_IFNAME" not in env:  # gloo listens on the address of the host name otherwise
        env["GLOO_SOCKET_IFNAME"] = lo
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
