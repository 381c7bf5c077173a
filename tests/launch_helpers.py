"""Helpers for tests that start real runs through radio-launch (real processes, real files)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Small and quick, yet both stages, both groups in stage 2, async checkpoints and a resume point in each stage.
FAST = [
    "stages.0.steps=4", "stages.1.steps=4", "checkpoint.every=2", "checkpoint.keep=10",
    "data.num_workers=1", "monitor.hang_timeout_s=120",
]


def launch_cmd(run_dir: Path, overrides: list[str], cluster: Path | None = None, recipe: str = "smoke") -> list[str]:
    cmd = [sys.executable, "-m", "radio_scale.launchers.cli", "--recipe", recipe, "--run-dir", str(run_dir)]
    if cluster is not None:
        cmd += ["--cluster", str(cluster)]
    return cmd + list(overrides)


def child_env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def run_launch(run_dir: Path, overrides: list[str], cluster: Path | None = None, timeout: int = 600,
               recipe: str = "smoke") -> subprocess.CompletedProcess:
    return subprocess.run(launch_cmd(run_dir, overrides, cluster, recipe), capture_output=True, text=True,
                          timeout=timeout, env=child_env())


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def heartbeat(run_dir: Path, rank: int) -> dict | None:
    path = run_dir / "heartbeats" / f"rank_{rank:05d}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def one_node_cluster(tmp_path: Path, tasks: int) -> Path:
    path = tmp_path / f"local_{tasks}.yaml"
    path.write_text(f"name: local{tasks}\nkind: local\ntasks_per_node: {tasks}\nthreads_per_rank: 1\n")
    return path
