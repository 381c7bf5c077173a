"""SLURM requeue decisions without SLURM: a fake run directory, SLURM's environment, a stub `scontrol` on PATH.

A deterministic failure (the same step twice, no progress in between) stops requeueing; progress, or a
preemption, keeps it going; `radio-monitor status` says why a run was not requeued.
"""
import json
import os
import stat
import time

import pytest

from radio_scale.config import config_to_yaml, load_config
from radio_scale.launchers.slurm import SlurmRankJob
from radio_scale.monitoring import rundir
from radio_scale.monitoring.cli import main as monitor_main
from radio_scale.monitoring.status import collect_status

JOB = "4242"


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """SLURM's environment for rank 0 of job 4242, and a stub scontrol that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    stub = bin_dir / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", JOB)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)

    class Slurm:
        def calls(self) -> list[str]:
            return log.read_text().splitlines() if log.exists() else []

        def restart(self, n: int) -> None:  # SLURM sets this in a requeued job
            monkeypatch.setenv("SLURM_RESTART_COUNT", str(n))

    s = Slurm()
    s.restart(0)
    return s


def make_run(tmp_path, step: int):
    run = tmp_path / "run"
    cfg = load_config("smoke")
    run.mkdir(exist_ok=True)
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    reach(run, step)
    return run


def reach(run, step: int) -> None:
    """The run got to `step`: every rank's heartbeat says so (as the trainer writes them)."""
    for rank in range(2):
        rundir.atomic_write_json(rundir.heartbeat_path(run, rank), {
            "rank": rank, "host": "node0", "pid": 100 + rank, "step": step, "stage": 0, "phase": "train",
            "time": time.time()})


def job_for(run) -> SlurmRankJob:
    return SlurmRankJob(str(run / "config.yaml"), str(run), max_requeues=20, env={}, threads=None)


def history(run) -> list[dict]:
    return json.loads((run / rundir.REQUEUES).read_text())["history"]


def test_an_oom_at_the_same_step_twice_is_not_requeued_again_and_status_says_why(tmp_path, slurm, monkeypatch,
                                                                                  capsys):
    run = make_run(tmp_path, step=5)
    import radio_scale.train.entry as entry

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(entry, "run_rank", oom)  # the crash, through the real submitit callable
    with pytest.raises(RuntimeError, match="out of memory"):
        job_for(run)()
    assert slurm.calls() == [f"requeue {JOB}"]
    first = history(run)[-1]
    assert (first["step"], first["cause"], first["restart"], first["job_id"]) == (5, "failure", 0, JOB)
    assert rundir.read_events(run)[-1]["kind"] == "requeue"

    slurm.restart(1)  # the requeued job resumed from its checkpoint and crashed at step 5 again
    with pytest.raises(RuntimeError, match="out of memory"):
        job_for(run)()
    assert slurm.calls() == [f"requeue {JOB}"]  # not requeued a second time
    assert len(history(run)) == 1
    last = rundir.read_events(run)[-1]
    assert last["kind"] == "failed" and last["step"] == 5 and last["requeued"] is False
    assert "failed twice at step 5 with no progress, not requeued" in last["message"]
    assert "out of memory" in last["message"]

    # another rank of the same job asking afterwards (e.g. its watchdog) changes nothing
    assert job_for(run)._requeue("rank 1 hung", failure=True) is False
    assert slurm.calls() == [f"requeue {JOB}"] and rundir.read_events(run)[-1] == last

    st = collect_status(run)
    assert st.state == "failed" and "failed twice at step 5 with no progress, not requeued" in st.reason
    assert monitor_main(["status", str(run)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "failed" in out and "failed twice at step 5 with no progress, not requeued" in out


def test_a_failure_after_progress_is_requeued(tmp_path, slurm):
    run = make_run(tmp_path, step=5)
    assert job_for(run)._requeue("failed: RuntimeError: boom", failure=True) is True
    slurm.restart(1)
    reach(run, 7)  # this time it got further before failing
    assert job_for(run)._requeue("failed: RuntimeError: boom", failure=True) is True
    assert slurm.calls() == [f"requeue {JOB}"] * 2
    assert [h["step"] for h in history(run)] == [5, 7]
    slurm.restart(2)  # and at step 7 again, with no progress: stop
    assert job_for(run)._requeue("failed: RuntimeError: boom", failure=True) is False
    assert slurm.calls() == [f"requeue {JOB}"] * 2
    assert "failed twice at step 7 with no progress" in rundir.read_events(run)[-1]["message"]


def test_preemptions_at_the_same_step_still_requeue(tmp_path, slurm):
    run = make_run(tmp_path, step=5)
    assert job_for(run)._requeue("preempted") is True
    slurm.restart(1)
    assert job_for(run)._requeue("preempted") is True  # preempted again before any step: not a failure
    slurm.restart(2)
    assert job_for(run)._requeue("rank 0 hung", failure=True) is True  # the first failure at step 5
    assert [h["cause"] for h in history(run)] == ["preempted", "preempted", "failure"]
    assert len(slurm.calls()) == 3


def test_a_new_job_in_the_same_run_dir_gets_its_own_retry(tmp_path, slurm, monkeypatch):
    run = make_run(tmp_path, step=5)
    assert job_for(run)._requeue("failed: X", failure=True) is True
    slurm.restart(1)
    assert job_for(run)._requeue("failed: X", failure=True) is False
    monkeypatch.setenv("SLURM_JOB_ID", "5555")  # the user fixed something and relaunched
    slurm.restart(0)
    assert job_for(run)._requeue("failed: X", failure=True) is True
    assert slurm.calls() == [f"requeue {JOB}", "requeue 5555"]


def test_progress_step_is_the_furthest_of_heartbeats_metrics_and_checkpoints(tmp_path):
    run = tmp_path / "run"
    assert rundir.progress_step(run) == 0  # nothing yet: a failure before the first step is at step 0
    reach(run, 3)
    assert rundir.progress_step(run) == 3
    rundir.append_jsonl(run / rundir.METRICS, {"step": 4, "loss/total": 1.0})
    assert rundir.progress_step(run) == 4
    done = rundir.checkpoint_path(run, 6)
    done.mkdir(parents=True)
    rundir.atomic_write_json(done / rundir.CHECKPOINT_COMPLETE, {"step": 6})
    rundir.checkpoint_path(run, 8).mkdir()  # half written: not progress
    assert rundir.progress_step(run) == 6
    elsewhere = tmp_path / "ckpts" / "step_000000009"
    elsewhere.mkdir(parents=True)
    rundir.atomic_write_json(elsewhere / rundir.CHECKPOINT_COMPLETE, {"step": 9})
    assert rundir.progress_step(run, tmp_path / "ckpts") == 9
