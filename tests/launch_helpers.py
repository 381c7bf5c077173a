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


def kill_in_checkpoint_then_relaunch(run_dir: Path, overrides: list[str], kill_at: int,
                                     cluster: Path | None = None, timeout: int = 600) -> int:
    """Start a run whose rank 0 is SIGKILLed (kill -9, monitor.inject_kill_in_checkpoint) while writing the
    checkpoint of step `kill_at`, check it died without an export and left that checkpoint half-written, then
    relaunch it unchanged (without the drill) and check it finished. Returns the step it resumed from."""
    from radio_scale.train.checkpoint import latest_complete

    r = run_launch(run_dir, [*overrides, f"monitor.inject_kill_in_checkpoint={kill_at}"], cluster, timeout)
    assert r.returncode != 0, "the run with the kill drill finished: the kill did not happen"
    assert not (run_dir / "export").exists()
    assert (run_dir / "checkpoints" / f".tmp-step_{kill_at:09d}").is_dir(), r.stdout[-3000:] + r.stderr[-3000:]
    newest = latest_complete(run_dir / "checkpoints")
    assert newest is not None, "no complete checkpoint before the kill"
    r = run_launch(run_dir, overrides, cluster, timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    resumed = [e for e in events(run_dir) if e["kind"] == "resume"]
    at = int(newest.name.split("_")[1])
    assert resumed and resumed[-1]["step"] == at
    assert events(run_dir)[-1]["kind"] == "finished"
    return at


def assert_same_run(reference: Path, run_dir: Path) -> None:
    """The export of `run_dir` equals `reference`'s tensor for tensor and byte for byte, and every step logged in
    `run_dir` (before and after a resume) logged the same losses as `reference`."""
    from safetensors.torch import load_file

    a = load_file(str(reference / "export" / "model.safetensors"))
    b = load_file(str(run_dir / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch_equal(a[k], b[k]), f"{k} differs from the uninterrupted run"
    for name in ("model.safetensors", "teachers.json"):
        assert (reference / "export" / name).read_bytes() == (run_dir / "export" / name).read_bytes(), name
    ref = {m["step"]: {k: v for k, v in m.items() if k.startswith("loss/")} for m in metrics(reference)}
    got = metrics(run_dir)
    assert sorted({m["step"] for m in got}) == sorted(ref)
    for m in got:
        losses = {k: v for k, v in m.items() if k.startswith("loss/")}
        assert losses == ref[m["step"]], f"step {m['step']}: logged losses differ from the uninterrupted run"


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
