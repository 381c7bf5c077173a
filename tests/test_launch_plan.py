"""The plan radio-launch prints, writes to plan.json (and tags in MLflow) is the plan every rank runs.

Plans are pure functions of the config, so no rank is started: the launcher runs in-process with the SLURM
submission stubbed, and the "rank" is what a rank does with the config.yaml the launcher wrote.
"""
import json
import types

import pytest
import torch

from radio_scale.config import load_config
from radio_scale.distributed.env import DistEnv
from radio_scale.distributed.plan import check_launch_plan, make_plan, plan_for_run
from radio_scale.launchers import cli

NODES, TASKS = 8, 8  # 64 ranks


def cluster_file(tmp_path, memory_gb: int, tflops: float = 312.0):
    path = tmp_path / f"gpu{memory_gb}.yaml"
    path.write_text(f"name: gpu{memory_gb}\nkind: slurm\ntasks_per_node: {TASKS}\ngpus_per_node: {TASKS}\n"
                    f"gpu_memory_gb: {memory_gb}\ngpu_tflops: {tflops}\n")
    return path


def launch(monkeypatch, tmp_path, cluster, *extra):
    """radio-launch --nodes 8 --recipe two_stage_auto, the sbatch submission stubbed; returns the run dir."""
    import radio_scale.launchers.slurm as slurm

    submitted = []
    monkeypatch.setattr(slurm, "submit", lambda *a, **k: submitted.append(a) or types.SimpleNamespace(job_id="42"))
    run_dir = tmp_path / "run"
    files = []  # a real launch checks that the teachers' checkpoint files exist; the plan never reads them
    for teacher in load_config("two_stage_auto").teachers:
        (tmp_path / f"{teacher.name}.pt").touch()
        files.append(f"teachers.{teacher.name}.checkpoint={tmp_path / f'{teacher.name}.pt'}")
    code = cli.main(["--nodes", str(NODES), "--recipe", "two_stage_auto", "--cluster", str(cluster),
                     "--run-dir", str(run_dir), *files, *extra])
    assert code == 0 and len(submitted) == 1
    return run_dir


def rank_plans(run_dir, world=NODES * TASKS):
    """What each rank plans: from the config.yaml the launcher wrote (SlurmRankJob loads exactly that file)."""
    cfg = load_config(str(run_dir / "config.yaml"))
    return cfg, [plan_for_run(cfg, world, i) for i in range(len(cfg.stages))]


@pytest.mark.parametrize("memory_gb", [40, 24])
def test_printed_and_written_launch_plan_is_the_plan_the_ranks_compute(monkeypatch, tmp_path, capsys, memory_gb):
    cluster = cluster_file(tmp_path, memory_gb)
    assert cli.main(["--nodes", str(NODES), "--recipe", "two_stage_auto", "--cluster", str(cluster), "--dry-run",
                     "--run-dir", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    run_dir = launch(monkeypatch, tmp_path, cluster)
    cfg, plans = rank_plans(run_dir)
    assert (cfg.hardware.gpu_memory_gb, cfg.hardware.gpu_tflops) == (memory_gb, 312.0)

    written = json.loads((run_dir / "plan.json").read_text())
    assert written["world_size"] == 64
    for plan, entry in zip(plans, written["stages"], strict=True):
        assert plan.table() in printed  # the dry-run printed this very plan
        assert json.loads(json.dumps(plan.to_dict())) == {k: v for k, v in entry.items() if k not in ("name", "steps")}
        assert (plan.memory_limit_gb, plan.device_tflops) == (memory_gb, 312.0)
        check_launch_plan(plan, run_dir)  # the rank-side check accepts it
        # the MLflow `plan` tag (Trainer._run_tags) calls make_plan(cfg, world, i): the same plan
        assert make_plan(cfg, 64, plan.stage_index).to_dict() == plan.to_dict()

    # and it is not the plan of the built-in 80 GB default the ranks used to fall back to
    default = make_plan(load_config("two_stage_auto"), 64, 1)
    assert default.memory_limit_gb == 80.0 and default.group("sam").batch_per_rank == 6
    mine, theirs = plans[1], default
    key = lambda p: [(g.name, g.ranks, g.batch_per_rank, g.activation_checkpointing) for g in p.groups]  # noqa: E731
    assert key(mine) != key(theirs)
    assert all(g.memory_gb <= memory_gb for g in mine.groups) and not mine.warnings
    if memory_gb == 24:  # checkpointing has to come on everywhere
        assert all(g.activation_checkpointing for g in mine.groups)


def test_command_line_hardware_override_wins_over_the_cluster_file(monkeypatch, tmp_path):
    run_dir = launch(monkeypatch, tmp_path, cluster_file(tmp_path, 40), "hardware.gpu_memory_gb=24")
    cfg, plans = rank_plans(run_dir)
    assert cfg.hardware.gpu_memory_gb == 24.0 and plans[1].memory_limit_gb == 24.0
    written = json.loads((run_dir / "plan.json").read_text())
    assert written["stages"][1]["memory_limit_gb"] == 24.0


def test_a_rank_whose_plan_differs_from_plan_json_refuses_to_start(monkeypatch, tmp_path):
    run_dir = launch(monkeypatch, tmp_path, cluster_file(tmp_path, 40))
    cfg, plans = rank_plans(run_dir)
    path = run_dir / "plan.json"
    launched = json.loads(path.read_text())

    # plan.json says SAM runs batch 6 (what the 80 GB default gives), the rank plans 5
    tampered = json.loads(json.dumps(launched))
    sam = next(g for g in tampered["stages"][1]["groups"] if g["name"] == "sam")
    sam["batch_per_rank"] = 6
    path.write_text(json.dumps(tampered))
    with pytest.raises(RuntimeError) as err:
        check_launch_plan(plans[1], run_dir)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"stage '{cfg.stages[1].name}'" in msg and "group 'sam'" in msg and "batch_per_rank" in msg and str(path) in msg
    check_launch_plan(plans[0], run_dir)  # stage 1 was not touched

    # the same check is what build_stage runs, before any teacher is built
    env = DistEnv(rank=0, world_size=64, local_rank=0, device=torch.device("cpu"), backend="gloo")
    from radio_scale.train.stage import build_stage

    with pytest.raises(RuntimeError, match="group 'sam': field 'batch_per_rank'"):
        build_stage(cfg, env, 1)

    # a rank that planned against other hardware, or at another world size, is refused too
    path.write_text(json.dumps(launched))
    with pytest.raises(RuntimeError, match="field 'memory_limit_gb' is 80.0 on this rank but 40.0"):
        check_launch_plan(make_plan(cfg, 64, 0, memory_limit_gb=80.0), run_dir)
    with pytest.raises(RuntimeError, match="field 'world_size' is 32 on this rank but 64"):
        check_launch_plan(plan_for_run(cfg, 32, 1), run_dir)


def test_no_plan_json_means_nothing_to_check(tmp_path):
    cfg = load_config("smoke")
    check_launch_plan(plan_for_run(cfg, 2, 1), tmp_path)
    check_launch_plan(plan_for_run(cfg, 2, 1), None)


@pytest.mark.parametrize("override, needle", [
    ("hardware.gpu_memory_gb=0", "key 'hardware.gpu_memory_gb' must be > 0"),
    ("hardware.gpu_tflops=-5", "key 'hardware.gpu_tflops' must be > 0"),
    ("hardware.gpu_memroy_gb=40", "unknown key 'hardware.gpu_memroy_gb'"),
    ("hardware.ranks_per_node=0", "key 'hardware.ranks_per_node' must be >= 1"),
    ("parallel.shard_group_size=-2", "key 'parallel.shard_group_size' must be >= 0"),
    ("parallel.student_sharding=zero3", "parallel.student_sharding"),
])
def test_bad_hardware_keys_are_one_line_errors(override, needle, capsys):
    assert cli.main(["--recipe", "smoke", "--dry-run", override]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "smoke.yaml" in lines[0]


def test_bad_cluster_gpu_memory_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("kind: slurm\ngpu_memory_gb: 0\n")
    assert cli.main(["--recipe", "smoke", "--cluster", str(path), "--dry-run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "key 'gpu_memory_gb' must be > 0" in lines[0] and str(path) in lines[0]


def test_the_cluster_files_node_size_reaches_the_plan_and_hybrid_that_cannot_run_is_refused(tmp_path, capsys):
    """tasks_per_node -> hardware.ranks_per_node (the HSDP shard group); an impossible hybrid is one line, exit 2."""
    cluster = tmp_path / "c.yaml"
    cluster.write_text("name: c\nkind: local\ntasks_per_node: 3\ninterconnect_gbps: 25\n")
    assert cli.main(["--recipe", "smoke", "--cluster", str(cluster), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "ranks_per_node: 3" in out and "interconnect_gbps: 25.0" in out
    assert cli.main(["--recipe", "smoke", "--cluster", str(cluster), "--dry-run", "parallel.student_sharding=hybrid",
                     "parallel.shard_group_size=2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "parallel.student_sharding" in lines[0] and "not a multiple" in lines[0], lines
