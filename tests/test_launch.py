"""radio-launch: dry-run plans, cluster config errors, and the NaN alert path of a real run."""
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


def test_nan_losses_are_skipped_then_rolled_back_to_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "nan"
    overrides = [*FAST, "stages.0.steps=8", "stages.1.steps=1", "monitor.inject_nan_steps=[3, 5, 6, 7]",
                 "monitor.nan_rollback_after=3"]
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
