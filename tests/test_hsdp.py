"""HSDP for the student (parallel.student_sharding: hybrid) with real processes: 4 gloo ranks as 2 "nodes" x 2.

Each teacher group owns one node; the student is FSDP2-sharded within a node and replicated across the two.
The gradients are checked against the single-process reference (and world FSDP) in test_gradient_semantics.py;
here: the launch plan, kill -9 + relaunch bit-identical under HSDP, and checkpoints that resume under the
other sharding.
"""
import json
import shutil

import pytest

from launch_helpers import (FAST, assert_same_run, events, kill_in_checkpoint_then_relaunch, metrics,
                            one_node_cluster, run_launch)
from radio_scale.train.checkpoint import list_complete

# stage 1: 4 steps, stage 2: 6 steps, checkpoints every 2 (4 = the stage boundary, 6 and 8 mid-stage 2)
RUN = [*FAST, "stages.1.steps=6", "hardware.ranks_per_node=2", "data.num_workers=0"]
HYBRID = [*RUN, "parallel.student_sharding=hybrid"]
WORLD = [*RUN, "parallel.student_sharding=world"]
STEPS = 10


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return one_node_cluster(tmp_path_factory.mktemp("cluster"), 4)


@pytest.fixture(scope="module")
def hsdp_run(tmp_path_factory, four_ranks):
    run_dir = tmp_path_factory.mktemp("hsdp") / "run"
    r = run_launch(run_dir, HYBRID, four_ranks, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return run_dir


def test_hsdp_run_plans_node_aligned_groups_and_finishes(hsdp_run):
    plan = json.loads((hsdp_run / "plan.json").read_text())
    stage2 = plan["stages"][1]
    assert stage2["student_sharding"] == "hybrid" and stage2["shard_group_size"] == 2
    assert [g["ranks"] for g in stage2["groups"]] == [[0, 1], [2, 3]]  # one "node" per teacher group
    assert [m["step"] for m in metrics(hsdp_run)] == list(range(1, STEPS + 1))
    assert events(hsdp_run)[-1]["kind"] == "finished"


def test_kill_9_during_a_checkpoint_then_relaunch_is_bit_identical_under_hsdp(hsdp_run, tmp_path, four_ranks):
    run_dir = tmp_path / "killed"
    at = kill_in_checkpoint_then_relaunch(run_dir, HYBRID, kill_at=8, cluster=four_ranks, timeout=900)
    assert at == 6  # mid-stage 2
    assert_same_run(hsdp_run, run_dir)


def _truncate(src, dst, keep_until: int):
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "export")
    for p in list_complete(dst / "checkpoints"):
        if int(p.name.split("_")[1]) > keep_until:
            shutil.rmtree(p)


def test_checkpoints_resume_under_the_other_sharding(hsdp_run, tmp_path, four_ranks):
    """An HSDP checkpoint (step 6, mid-stage 2) resumed under world FSDP: DCP reshards the 2-D mesh's shards onto
    the 1-D mesh, and the resumed steps compute the uninterrupted HSDP run's losses (float reduction order aside).
    (World -> HSDP is the same DCP resharding the other way.)"""
    ref = {m["step"]: m["loss/total"] for m in metrics(hsdp_run)}
    as_world = tmp_path / "as_world"
    _truncate(hsdp_run, as_world, keep_until=6)
    r = run_launch(as_world, WORLD, four_ranks, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert json.loads((as_world / "plan.json").read_text())["stages"][1]["student_sharding"] == "world"
    assert [e["step"] for e in events(as_world) if e["kind"] == "resume"][-1] == 6
    got = {m["step"]: m["loss/total"] for m in metrics(as_world)}
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(7, STEPS + 1):
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-6), step
