"""On a real (localhost) SLURM: submit the smoke recipe, preempt it mid-run, and check requeue + resume + one MLflow run.

Needs the controller that `.ci/slurm/start.sh` starts; CI sets RADIO_REQUIRE_SLURM=1 so a missing controller fails
instead of skipping.
"""
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from launch_helpers import FAST, events, heartbeat, metrics, run_launch, wait_for

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster_configs" / "local_slurm.yaml"


def slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and any(s.strip() in ("idle", "mixed", "allocated") for s in r.stdout.split())


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not slurm_up() and not os.environ.get("RADIO_REQUIRE_SLURM"),
                       reason="no SLURM controller on localhost (bash .ci/slurm/start.sh starts one)"),
]


def job_state(job_id: str) -> str:
    r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return r.stdout.strip() or "GONE"


@pytest.mark.parametrize("backend", [[], ["distributed_backend=deepspeed", "deepspeed.zero_stage=3"]],
                         ids=["fsdp2", "deepspeed"])
def test_preempted_slurm_job_requeues_resumes_and_keeps_one_mlflow_run(tmp_path, backend):
    assert slurm_up(), "SLURM controller is not running"
    run_dir = tmp_path / "run"
    steps = ["stages.0.steps=6", "stages.1.steps=6", *backend]
    r = run_launch(run_dir, [*FAST, *steps], cluster=CLUSTER, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = re.search(r"submitted SLURM job (\d+)", r.stdout).group(1)
    assert f"run directory: {run_dir.resolve()}" in r.stdout and "radio-monitor status" in r.stdout
    try:
        wait_for(lambda: (h := heartbeat(run_dir, 0)) and h.get("step", 0) >= 3, 600, "rank 0 to reach step 3")
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        wait_for(lambda: any(e["kind"] == "requeue" for e in events(run_dir)), 300, "the requeue event")
        # SLURM holds a requeued job ~2 minutes (BeginTime) before it may start again; waive that in the test
        wait_for(lambda: job_state(job_id) == "PENDING", 300, "the requeued job to be pending")
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], timeout=30)
        wait_for(lambda: any(e["kind"] == "finished" for e in events(run_dir)), 900, "the requeued job to finish")
        wait_for(lambda: job_state(job_id) == "GONE", 300, "the job to leave the queue")
    finally:
        if job_state(job_id) != "GONE":
            subprocess.run(["scancel", job_id], timeout=30)
    kinds = [e["kind"] for e in events(run_dir)]
    assert kinds.index("preempt") < kinds.index("requeue") < kinds.index("resume") < kinds.index("finished")
    assert (run_dir / "requeues.json").is_file()
    steps_logged = [m["step"] for m in metrics(run_dir)]
    assert steps_logged == list(range(1, 13))  # every step once, in order, across the requeue
    assert (run_dir / "export" / "model.safetensors").is_file()

    from radio_scale.monitoring.tracking import read_metric_history
    import mlflow

    uri = f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    runs = [r for exp in client.search_experiments() for r in client.search_runs([exp.experiment_id])]
    assert len(runs) == 1  # the requeued job continued the same MLflow run
    history = read_metric_history(uri, runs[0].info.run_id, "loss/total")
    assert [step for step, _ in history] == list(range(1, 13))
