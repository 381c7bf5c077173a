"""The DeepSpeed backend with real processes (gloo, CPU): a two-stage two-group run under ZeRO-3, kill -9 and
relaunch bit-identical, a two-rank ZeRO-3 checkpoint resumed on one rank through DeepSpeed's universal format,
and the config errors. Gradients under ZeRO-1/2/3: tests/test_gradient_semantics.py."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from launch_helpers import (FAST, assert_same_run, events, kill_in_checkpoint_then_relaunch, metrics,
                            one_node_cluster, run_launch)
from radio_scale.config import load_config
from radio_scale.config.loader import ConfigError
from radio_scale.train.checkpoint import list_complete, load_model_weights

# stage 1: 4 steps, stage 2: 6 steps, checkpoints every 2 (6 and 8 mid-stage 2)
ZERO3 = [*FAST, "stages.1.steps=6", "data.num_workers=0", "distributed_backend=deepspeed", "deepspeed.zero_stage=3"]
STEPS = 10


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("zero3") / "run"
    r = run_launch(run_dir, ZERO3)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return run_dir


def test_two_stage_two_group_run_completes_under_zero3_with_deepspeeds_checkpoints(zero3_run):
    recs = metrics(zero3_run)
    assert [m["step"] for m in recs] == list(range(1, STEPS + 1))
    stage2 = [m for m in recs if m["stage"] == 1]
    assert all("loss/sam/spatial" in m and "loss/clip/summary" in m for m in stage2)
    assert all(m["grad_norm"] > 0 for m in recs)
    assert events(zero3_run)[-1]["kind"] == "finished"
    newest = list_complete(zero3_run / "checkpoints")[-1]
    # DeepSpeed's own sharded format, one model-state and one optimizer-state file per rank, no DCP metadata
    assert len(list(newest.glob("*optim_states.pt"))) == 2 and not (newest / ".metadata").exists()
    # the export holds the same weights as the final checkpoint (gathered from the ZeRO-3 partitions)
    export = load_file(str(zero3_run / "export" / "model.safetensors"))
    saved = load_model_weights(newest)
    for k, v in export.items():
        assert torch.equal(v, saved[k].to(v.dtype)), k


def test_kill_9_during_a_checkpoint_then_relaunch_is_bit_identical_under_zero3(zero3_run, tmp_path):
    at = kill_in_checkpoint_then_relaunch(tmp_path / "killed", ZERO3, kill_at=8)
    assert at == 6
    assert_same_run(zero3_run, tmp_path / "killed")


def test_a_two_rank_zero3_checkpoint_resumes_on_one_rank(zero3_run, tmp_path):
    """Through DeepSpeed's universal checkpoint (converted once beside the shards): the resumed model is exactly
    the checkpoint's (the run is resumed at its last step, so its export is the resumed state: equal to the
    checkpoint's fp32 weights)."""
    run_dir = tmp_path / "one_rank"
    shutil.copytree(zero3_run, run_dir)
    shutil.rmtree(run_dir / "export")
    for p in list_complete(run_dir / "checkpoints"):
        if int(p.name.split("_")[1]) > 6:
            shutil.rmtree(p)
    one = one_node_cluster(tmp_path, 1)
    # resumed with the run ending at step 6: nothing to train, the export is the resumed state
    r = run_launch(run_dir, [*ZERO3, "stages.1.steps=2"], cluster=one)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    resumed = [e for e in events(run_dir) if e["kind"] == "resume"]
    assert "written by 2 ranks, now 1" in resumed[-1]["message"]
    assert (run_dir / "checkpoints" / "step_000000006" / "universal").is_dir()
    export = load_file(str(run_dir / "export" / "model.safetensors"))
    saved = load_model_weights(run_dir / "checkpoints" / "step_000000006")
    assert export and all(torch.equal(v, saved[k].to(v.dtype)) for k, v in export.items())
    assert events(run_dir)[-1]["kind"] == "finished"


@pytest.mark.parametrize("overrides, needle", [
    (["distributed_backend=deepspeed", "deepspeed.zero_stage=4"], "key 'deepspeed.zero_stage' is 4"),
    (["deepspeed.offload_optimizer=cpu"], "key 'deepspeed.offload_optimizer' is 'cpu', but distributed_backend is 'fsdp2'"),
    (["distributed_backend=deepspeed", "deepspeed.offload_param=cpu"], "key 'deepspeed.offload_param' is 'cpu'"),
    (["distributed_backend=deepspeed", "parallel.student_sharding=hybrid"], "key 'parallel.student_sharding'"),
    (["distributed_backend=megatron"], "distributed_backend"),
])
def test_bad_backend_combinations_are_one_line_config_errors(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config("smoke", overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_deepspeed_config_comes_from_the_recipe():
    from radio_scale.distributed.backends.deepspeed import deepspeed_config

    cfg = load_config("smoke", ["distributed_backend=deepspeed", "deepspeed.zero_stage=3",
                                "deepspeed.offload_optimizer=cpu", "optim.grad_clip=0.5",
                                "deepspeed.config={zero_optimization: {reduce_bucket_size: 1000}}"])
    ds = deepspeed_config(cfg, torch.device("cpu"))
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000  # merged over the generated dict
    assert ds["bf16"] == {"enabled": False}  # fp32 on CPU
    json.dumps(ds)


def test_the_planner_counts_what_each_zero_stage_keeps_whole():
    """ZeRO-1 keeps bf16 params and grads on every rank, ZeRO-2 the params, ZeRO-3 (like FSDP2) nothing."""
    from radio_scale.distributed.plan import make_plan

    def states(*o):
        plan = make_plan(load_config("two_stage", list(o)), 64, 1)
        return plan.group("clip_dino").memory_breakdown_gb["student_states"]

    fsdp2, z1, z2, z3 = (states(), states("distributed_backend=deepspeed", "deepspeed.zero_stage=1"),
                         states("distributed_backend=deepspeed", "deepspeed.zero_stage=2"),
                         states("distributed_backend=deepspeed", "deepspeed.zero_stage=3"))
    assert z3 == fsdp2 and z1 > z2 > z3
    params = 0.70e9  # ViT-H/16 student + heads, roughly
    assert (z1 - z2) == pytest.approx(2 * params / 2**30, rel=0.15)  # bf16 grads whole under ZeRO-1
