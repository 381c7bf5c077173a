"""SLURM submission through submitit, with preemption-safe requeue into the same run directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from radio_scale.launchers.cluster import ClusterConfig


def slurm_parameters(cluster: ClusterConfig, nodes: int, job_name: str) -> dict:
    """submitit SlurmExecutor parameters for this cluster and node count."""
    params = {
        "job_name": job_name,
        "nodes": nodes,
        "ntasks_per_node": cluster.tasks_per_node,
        "cpus_per_task": cluster.cpus_per_task,
        "time": cluster.time_limit_min,
        "signal_delay_s": cluster.signal_delay_s,
        "setup": list(cluster.setup),
        "stderr_to_stdout": True,
    }
    if cluster.gpus_per_node:
        params["gpus_per_node"] = cluster.gpus_per_node
    if cluster.mem_per_task_gb:
        params["mem"] = f"{int(cluster.mem_per_task_gb * cluster.tasks_per_node)}G"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cluster, key):
            params[key] = getattr(cluster, key)
    if cluster.exclusive:
        params["exclusive"] = True
    return params


def sbatch_preview(cluster: ClusterConfig, nodes: int, job_name: str, folder: Path) -> str:
    """The exact sbatch script submitit would submit (for --dry-run; submits nothing)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=command, folder=str(folder), **slurm_parameters(cluster, nodes, job_name))


class SlurmRankJob:
    """The submitit callable: every task runs one rank; a preempted run requeues itself (bounded)."""

    def __init__(self, config_path: str, run_dir: str, max_requeues: int, env: dict, threads: Optional[int]):
        self.config_path = config_path
        self.run_dir = run_dir
        self.max_requeues = max_requeues
        self.env = dict(env)
        self.threads = threads

    def __call__(self) -> str:
        from radio_scale.config import load_config
        from radio_scale.train.entry import run_rank

        os.environ.update({k: str(v) for k, v in self.env.items()})
        if self.threads:
            os.environ["RADIO_THREADS_PER_RANK"] = str(self.threads)
        cfg = load_config(self.config_path, check_files=True)
        try:
            status = run_rank(cfg, Path(self.run_dir), on_preempted=lambda: self._requeue("preempted"),
                              on_hang=lambda report: self._requeue(f"rank {report['rank']} hung"))
        except Exception as e:  # a crash anywhere reaches rank 0 as a collective error: it requeues (bounded)
            if os.environ.get("SLURM_PROCID", "0") == "0":
                self._requeue(f"failed: {type(e).__name__}: {e}"[:300])
            raise
        if status == "preempted":
            sys.exit(-1)  # like submitit's own handler: no result file, the requeued job continues the run
        return status

    def _requeue(self, reason: str) -> bool:
        """Requeue this job (after a preemption checkpoint, a hang or a crash) unless the budget is spent.

        After a hang several ranks may ask at once: the first `scontrol requeue` wins, the others fail
        harmlessly because the job is no longer running.
        """
        from radio_scale.monitoring.rundir import append_event, record_requeue

        rank = int(os.environ.get("SLURM_PROCID", "0"))
        job_id = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
        done = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if job_id is None or done >= self.max_requeues:
            append_event(self.run_dir, "failed", rank, f"{reason}; not requeued ({done} of {self.max_requeues} used)")
            return False
        count = record_requeue(self.run_dir, reason, job_id=job_id)
        append_event(self.run_dir, "requeue", rank, f"requeue {count} of job {job_id}: {reason}", job_id=job_id,
                     count=count)
        try:
            subprocess.check_call(["scontrol", "requeue", job_id], timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            append_event(self.run_dir, "failed", rank, f"scontrol requeue {job_id} failed: {e}")
            return False
        return True

    def checkpoint(self):
        """submitit's hook when a signal arrives before training installed its own handler: requeue as is."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def submit(cluster: ClusterConfig, nodes: int, config_path: Path, run_dir: Path, job_name: str):
    """Submit the run to SLURM; returns the submitit job."""
    import submitit

    folder = run_dir / "slurm"
    executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=cluster.max_requeues)
    executor.update_parameters(**slurm_parameters(cluster, nodes, job_name))
    env = dict(cluster.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    job = executor.submit(SlurmRankJob(str(config_path), str(run_dir), cluster.max_requeues, env, cluster.threads_per_rank))
    return job
