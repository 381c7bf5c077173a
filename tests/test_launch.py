"""radio-launch: dry-run plans, cluster config errors, picking the cluster (--nodes, RADIO_CLUSTER, python), and the
NaN alert path of a real run."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch_helpers import FAST, events, metrics, one_node_cluster, run_launch

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "cluster_configs" / "h100_slurm_example.yaml"


def launch(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "radio_scale.launchers.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_two_stage_on_8_nodes_plans_64_ranks_and_prints_the_sbatch_script(tmp_path):
    r = launch("--nodes", "8", "--recipe", "two_stage", "--cluster", str(EXAMPLE), "--dry-run",
               "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "64 ranks = 8 node(s) x 8" in out
    # stage 1: one group on all 64 ranks; stage 2: the paper's 32/32 split
    assert re.search(r"^clip_dino\s+0-63\s+64\s+16\s+256\s", out, re.M)
    assert re.search(r"^clip_dino\s+0-31\s+32\s+32\s+432\s", out, re.M)
    assert re.search(r"^sam\s+32-63\s+32\s+2\s+1024\s", out, re.M)
    for directive in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                      "#SBATCH --partition=gpu", "#SBATCH --account=my-account", "#SBATCH --qos=normal",
                      "#SBATCH --constraint=h100", "#SBATCH --exclusive", "#SBATCH --signal=USR2@300",
                      "module load cuda/12.4 nccl"):
        assert directive in out, directive
    assert "utilisation" in out and "effective batch 1088" in out
    assert not (tmp_path / "run").exists()  # a dry-run starts nothing and writes nothing


def test_dry_run_auto_plan_beats_the_paper_split_on_64_gpus():
    r = launch("--nodes", "8", "--recipe", "two_stage_auto", "--cluster", str(EXAMPLE), "--dry-run")
    assert r.returncode == 0, r.stderr
    utils = [float(line.split("utilisation ")[1].split()[0]) for line in r.stdout.splitlines() if "utilisation " in line]
    assert len(utils) == 2 and utils[1] >= 0.95


@pytest.mark.parametrize("body, needle", [
    ("kind: slurm\ntasks_per_node: 0\n", "key 'tasks_per_node' must be > 0"),
    ("kind: pbs\n", "key 'kind' must be one of 'local', 'slurm'"),
    ("kind: slurm\npartitoin: gpu\n", "unknown key 'partitoin'"),
    ("kind: slurm\ntasks_per_node: 8\ngpus_per_node: 4\n", "key 'tasks_per_node' (8) must equal 'gpus_per_node' (4)"),
    ("kind: slurm\nsetup: module load x\n", "key 'setup' must be tuple"),
    ("kind: [slurm\n", "is not valid YAML"),
])
def test_malformed_cluster_config_is_one_line_naming_the_key(tmp_path, body, needle):
    path = tmp_path / "cluster.yaml"
    path.write_text(body)
    r = launch("--recipe", "smoke", "--cluster", str(path), "--dry-run")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and str(path) in lines[0], r.stderr


def test_missing_cluster_file_is_named(tmp_path):
    r = launch("--recipe", "smoke", "--cluster", str(tmp_path / "nope.yaml"), "--dry-run")
    assert r.returncode == 2 and "cluster config not found" in r.stderr and "nope.yaml" in r.stderr


@pytest.mark.parametrize("backend", [[], ["distributed_backend=deepspeed", "deepspeed.zero_stage=2"]],
                         ids=["fsdp2", "deepspeed"])
def test_nan_losses_are_skipped_then_rolled_back_to_the_last_checkpoint(tmp_path, backend):
    run_dir = tmp_path / "nan"
    overrides = [*FAST, "stages.0.steps=8", "stages.1.steps=1", "monitor.inject_nan_steps=[3, 5, 6, 7]",
                 "monitor.nan_rollback_after=3", *backend]
    r = run_launch(run_dir, overrides, cluster=one_node_cluster(tmp_path, 1))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    ev = events(run_dir)
    skips = [e["step"] for e in ev if e["kind"] == "nan_skip"]
    rollbacks = [e for e in ev if e["kind"] == "nan_rollback"]
    assert skips == [3, 5, 6]
    # step 7 was the third non-finite step in a row; no checkpoint is written mid-streak, so back to step 4
    assert len(rollbacks) == 1 and rollbacks[0]["step"] == 4
    steps = [m["step"] for m in metrics(run_dir)]
    assert steps == list(range(1, 10))  # every step logged once, the replayed one included
    assert ev[-1]["kind"] == "finished"


# --- picking the cluster: --nodes on one machine, RADIO_CLUSTER, the interpreter the nodes run ---------------------


def env_without_site_cluster(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RADIO_CLUSTER"}
    return {**env, **extra}


def test_several_nodes_without_a_cluster_are_refused_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "radio_scale.launchers.cli", "--nodes", "2", "--recipe", "two_stage",
                        "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=300,
                       env=env_without_site_cluster())
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "--nodes 2" in lines[0] and "--cluster" in lines[0] and "RADIO_CLUSTER" in lines[0]
    assert not run_dir.exists() and r.stdout == ""  # nothing started, nothing written


def test_several_nodes_on_an_explicit_local_cluster_file_are_refused_too(tmp_path, monkeypatch, capsys):
    from radio_scale.launchers.cli import main

    monkeypatch.delenv("RADIO_CLUSTER", raising=False)
    local = REPO / "cluster_configs" / "local.yaml"
    assert main(["--nodes", "3", "--recipe", "smoke", "--cluster", str(local), "--dry-run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--nodes 3" in lines[0] and str(local) in lines[0] and "RADIO_CLUSTER" in lines[0]
    assert main(["--nodes", "1", "--recipe", "smoke", "--cluster", str(local), "--dry-run"]) == 0


def test_radio_cluster_makes_the_short_command_submit_to_slurm(tmp_path):
    r = subprocess.run([sys.executable, "-m", "radio_scale.launchers.cli", "--nodes", "8", "--recipe", "two_stage",
                        "--dry-run", "--run-dir", str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=300, env=env_without_site_cluster(RADIO_CLUSTER=str(EXAMPLE)))
    assert r.returncode == 0, r.stderr
    assert "64 ranks = 8 node(s) x 8 on cluster 'h100' (slurm)" in r.stdout
    assert f"cluster file: {EXAMPLE} (from $RADIO_CLUSTER)" in r.stdout
    assert "#SBATCH --nodes=8" in r.stdout and "submitit.core._submit" in r.stdout
    assert "loopback_torchrun" not in r.stdout  # the local launcher's torchrun


def test_the_cluster_option_wins_over_radio_cluster(tmp_path, monkeypatch, capsys):
    from radio_scale.launchers.cli import main

    monkeypatch.setenv("RADIO_CLUSTER", str(EXAMPLE))
    local = REPO / "cluster_configs" / "local.yaml"
    assert main(["--recipe", "smoke", "--cluster", str(local), "--dry-run", "--run-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "on cluster 'local' (local)" in out and "radio_scale.launchers.loopback_torchrun" in out and "#SBATCH" not in out


def test_radio_cluster_naming_a_missing_file_is_one_line(tmp_path, monkeypatch, capsys):
    from radio_scale.launchers.cli import main

    monkeypatch.setenv("RADIO_CLUSTER", str(tmp_path / "gone.yaml"))
    assert main(["--recipe", "smoke", "--dry-run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "gone.yaml" in lines[0] and "RADIO_CLUSTER" in lines[0]


def test_the_cluster_python_is_what_the_sbatch_script_runs(tmp_path, capsys):
    from radio_scale.launchers.cli import main

    cluster = tmp_path / "site.yaml"
    cluster.write_text(EXAMPLE.read_text().replace("python: /shared/envs/radio/bin/python",
                                                   "python: /opt/site-venv/bin/python"))
    assert main(["--nodes", "2", "--recipe", "smoke", "--cluster", str(cluster), "--dry-run",
                 "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "source /shared/envs/radio/bin/activate" in out  # setup runs first
    srun = [line for line in out.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and " /opt/site-venv/bin/python -u -m submitit.core._submit " in srun[0]
    assert sys.executable not in out

    # without the key: the submitting interpreter, as before
    cluster.write_text("name: plain\nkind: slurm\ntasks_per_node: 2\n")
    assert main(["--recipe", "smoke", "--cluster", str(cluster), "--dry-run", "--run-dir", str(tmp_path / "run")]) == 0
    assert f" {sys.executable} -u -m submitit.core._submit " in capsys.readouterr().out


def test_the_real_submission_runs_the_cluster_python(tmp_path, monkeypatch):
    import submitit

    from radio_scale.launchers.cluster import load_cluster
    from radio_scale.launchers.slurm import submit

    made = {}

    class FakeExecutor:
        def __init__(self, folder, max_num_timeout=3, max_pickle_size_gb=1.0, python=None):
            made.update(folder=folder, python=python)

        def update_parameters(self, **params):
            made["params"] = params

        def submit(self, fn):
            made["fn"] = fn
            return "job"

    monkeypatch.setattr(submitit, "SlurmExecutor", FakeExecutor)
    assert submit(load_cluster(str(EXAMPLE)), 8, tmp_path / "config.yaml", tmp_path, "two_stage") == "job"
    assert made["python"] == "/shared/envs/radio/bin/python" and made["params"]["nodes"] == 8
