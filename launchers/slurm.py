"""SLURM submission through submitit, with preemption-safe requeue into the same run directory."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
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
        # srun does not inherit sbatch's --cpus-per-task on recent SLURM (>= 22.05): without it on the srun line
        # every rank and its data workers share one core
        "srun_args": [f"--cpus-per-task={cluster.cpus_per_task}"],
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


def python_command(cluster: ClusterConfig) -> str:
    """The interpreter the compute nodes run (after `setup`): the cluster's `python`, else the submitting one."""
    return cluster.python or shlex.quote(sys.executable)


def sbatch_preview(cluster: ClusterConfig, nodes: int, job_name: str, folder: Path) -> str:
    """The exact sbatch script submitit would submit (for --dry-run; submits nothing)."""
    from submitit.slurm.slurm import _make_sbatch_string

    # as submitit.SlurmExecutor._submitit_command_str builds it
    command = " ".join([python_command(cluster), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=str(folder), **slurm_parameters(cluster, nodes, job_name))


class SlurmRankJob:
    """The submitit callable: every task runs one rank; a preempted run requeues itself (bounded).

    A failure (exception, hang) requeues too, unless the previous failure of the same job was at the same
    step and the run has made no progress since: a deterministic crash (say, out of memory at step N) then
    stops after its second occurrence instead of burning every requeue.
    """

    def __init__(self, config_path: str, run_dir: str, max_requeues: int, env: dict, threads: Optional[int],
                 device: str = "auto"):
        self.config_path = config_path
        self.run_dir = run_dir
        self.max_requeues = max_requeues
        self.env = dict(env)
        self.threads = threads
        self.device = device  # the cluster file's `device`: cuda makes a rank without a usable GPU refuse to start
        self.checkpoint_dir: Optional[str] = None  # the config's checkpoint.dir, known once the config is loaded

    def __call__(self) -> str:
        from radio_scale.config import load_config
        from radio_scale.train.entry import run_rank

        os.environ.update({k: str(v) for k, v in self.env.items()})
        if self.threads:
            os.environ["RADIO_THREADS_PER_RANK"] = str(self.threads)
        cfg = load_config(self.config_path, check_files=True)
        self.checkpoint_dir = cfg.checkpoint.dir
        try:
            status = run_rank(cfg, Path(self.run_dir), on_preempted=lambda: self._requeue("preempted"),
                              on_hang=lambda report: self._requeue(f"rank {report['rank']} hung", failure=True),
                              device=getattr(self, "device", "auto"))
        except Exception as e:  # a crash anywhere reaches rank 0 as a collective error: it requeues (bounded)
            if os.environ.get("SLURM_PROCID", "0") == "0":
                self._requeue(f"failed: {type(e).__name__}: {e}"[:300], failure=True)
            raise
        if status == "preempted":
            sys.exit(-1)  # like submitit's own handler: no result file, the requeued job continues the run
        return status

    def _requeue(self, reason: str, failure: bool = False) -> bool:
        """Requeue this job (after a preemption checkpoint, a hang or a crash) unless that would not help.

        Not requeued: outside SLURM, when the budget (`max_requeues`) is spent, or when `failure` (a crash or a
        hang, not a preemption) happens at the same step as this job's previous failure with no progress in
        between (the step: `progress_step` of the run directory, recorded with every requeue). Each refusal is
        a `failed` event saying why. After a hang every rank's watchdog asks at once: one rank owns the decision
        for this job and restart count (the first to create its claim file, `_claim`) and is the only one that
        writes requeues.json, the event and calls scontrol; the others read at most and do nothing.
        """
        from radio_scale.monitoring.rundir import (REQUEUES, append_event, progress_step, read_json, record_requeue,
                                                   record_requeue_stopped)

        rank = int(os.environ.get("SLURM_PROCID", "0"))
        job_id = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
        done = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        state = read_json(Path(self.run_dir) / REQUEUES)
        state = state if isinstance(state, dict) else {}
        history = [h for h in state.get("history", []) if isinstance(h, dict)]
        this_job = [h for h in history if h.get("job_id") == job_id]
        if job_id is not None:
            if any(h.get("restart") == done for h in this_job):
                return True  # another rank already requeued this job
            stopped = state.get("stopped")
            if isinstance(stopped, dict) and stopped.get("job_id") == job_id and stopped.get("restart") == done:
                return False  # another rank already decided not to
        if job_id is not None and not self._claim(job_id, done, rank):
            return False  # another rank of this job owns the decision (and the shared files) for this restart
        step = progress_step(self.run_dir, self.checkpoint_dir)
        failures = [h["step"] for h in this_job if h.get("cause") == "failure" and isinstance(h.get("step"), int)]
        refusal = None
        if job_id is None:
            refusal = f"{reason}; not requeued (not a SLURM job)"
        elif failure and failures and step <= failures[-1]:
            refusal = (f"failed twice at step {step} with no progress, not requeued "
                       f"({done} of {self.max_requeues} requeues used): {reason}")
        elif done >= self.max_requeues:
            refusal = f"{reason}; not requeued ({done} of {self.max_requeues} used)"
        if refusal is not None:
            if job_id is not None:
                record_requeue_stopped(self.run_dir, refusal, job_id=job_id, restart=done, step=step)
            append_event(self.run_dir, "failed", rank, refusal, step=step, job_id=job_id, requeued=False)
            return False
        count = record_requeue(self.run_dir, reason, job_id=job_id, restart=done, step=step,
                              cause="failure" if failure else "preempted")
        append_event(self.run_dir, "requeue", rank, f"requeue {count} of job {job_id} at step {step}: {reason}",
                     job_id=job_id, count=count, step=step)
        try:
            subprocess.check_call(["scontrol", "requeue", job_id], timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            append_event(self.run_dir, "failed", rank, f"scontrol requeue {job_id} failed: {e}")
            return False
        return True

    def _claim(self, job_id: str, restart: int, rank: int) -> bool:
        """Whether this rank owns the requeue decision of (job, restart): an exclusive create on the shared disk,
        so exactly one of the ranks asking at once writes the shared files (no read-modify-write race)."""
        folder = Path(self.run_dir) / "slurm" / "requeue_claims"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(folder / f"{job_id}_{restart}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"rank {rank} pid {os.getpid()} time {time.time():.3f}\n")
        return True

    def checkpoint(self):
        """submitit's hook when a signal arrives before training installed its own handler: requeue as is."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def submit(cluster: ClusterConfig, nodes: int, config_path: Path, run_dir: Path, job_name: str):
    """Submit the run to SLURM; returns the submitit job."""
    import submitit

    folder = run_dir / "slurm"
    executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=cluster.max_requeues,
                                      python=python_command(cluster))
    executor.update_parameters(**slurm_parameters(cluster, nodes, job_name))
    env = dict(cluster.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    job = executor.submit(SlurmRankJob(str(config_path), str(run_dir), cluster.max_requeues, env,
                                       cluster.threads_per_rank, device=cluster.device))
    return job
