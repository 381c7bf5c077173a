"""Every bad input stopped at the door: value ranges of the run and cluster configs, unreadable files, rank counts
that do not fit the world and malformed command lines are one line naming the key and the file (exit code 2 from
radio-launch), never a traceback or a run that starts and fails later."""
import subprocess
import sys

import pytest

from radio_scale.config import ConfigError, load_config
from radio_scale.distributed.plan import make_plan
from radio_scale.launchers.cluster import load_cluster

PER_STAGE = "optim.schedule=per_stage"  # stage learning rates only exist under the per-stage schedule

# (overrides on the smoke recipe, the key the message must name)
BAD_VALUES = [
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=-1e-3"], "optim.lr"),
    (["optim.lr=nan"], "optim.lr"),
    (["optim.lr=.inf"], "optim.lr"),
    ([PER_STAGE, "stages.1.lr=0"], "stages.1.lr"),
    ([PER_STAGE, "stages.0.lr=-1"], "stages.0.lr"),
    ([PER_STAGE, "stages.1.lr=.nan"], "stages.1.lr"),
    (["optim.grad_clip=-1"], "optim.grad_clip"),
    (["optim.grad_clip=0"], "optim.grad_clip"),
    (["optim.eps=0"], "optim.eps"),
    (["optim.betas=[0.9, 1.0]"], "optim.betas.1"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay"),
    (["checkpoint.every=0"], "checkpoint.every"),
    (["checkpoint.keep=0"], "checkpoint.keep"),
    (["tracking.log_every=0"], "tracking.log_every"),
    (["monitor.heartbeat_every=-1"], "monitor.heartbeat_every"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["data.shuffle_buffer=-5"], "data.shuffle_buffer"),
    (["data.shards_per_chunk=0"], "data.shards_per_chunk"),
    (["data.crop_scale=[0.9, 0.2]"], "data.crop_scale"),
    (["stages.0.warmup_steps=-1"], "stages.0.warmup_steps"),
    (["student.depth=0"], "student.depth"),
    (["student.depth=-2"], "student.depth"),
    (["student.patch_size=0"], "student.patch_size"),  # was a ZeroDivisionError traceback
    (["student.num_heads=5"], "student.num_heads"),  # 5 does not divide the recipe's embed_dim 96
    (["student.embed_dim=100"], "student.num_heads"),  # the recipe's 3 heads do not divide 100
    (["student.embed_dim=null", "student.num_heads=5"], "student.num_heads"),  # nor does 5 the preset's 64
    (["student.global_blocks=[4]"], "student.global_blocks.0"),  # depth 4: blocks 0..3
    (["teachers.clip.input_size=0"], "teachers.clip.input_size"),
    (["teachers.sam.input_size=-128"], "teachers.sam.input_size"),
    (["teachers.clip.spatial_weight=.inf"], "teachers.clip.spatial_weight"),
    (["teachers.dino.summary_weight=-1"], "teachers.dino.summary_weight"),
    (["loss.alpha=nan"], "loss.alpha"),
    (["loss.beta=.inf"], "loss.beta"),
    (["monitor.hang_timeout_s=nan"], "monitor.hang_timeout_s"),
    (["monitor.straggler_ratio=.inf"], "monitor.straggler_ratio"),
    (["monitor.nan_rollback_after=0"], "monitor.nan_rollback_after"),
    (["hardware.gpu_tflops=0"], "hardware.gpu_tflops"),
    (["hardware.gpu_memory_gb=-80"], "hardware.gpu_memory_gb"),
    (["stages.0.groups.0.sampling_rate=nan"], "stages.0.groups.0.sampling_rate"),
    (["eval.knn_temperature=0"], "eval.knn_temperature"),
    (["seed=-1"], "seed"),  # numpy's SeedSequence refuses negative entropy at the first step otherwise
]


def _one_line(msg: str) -> None:
    assert "\n" not in msg and "Traceback" not in msg, msg


@pytest.mark.parametrize("overrides, key", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_value_is_one_line_naming_the_key_and_the_recipe(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config("smoke", overrides)
    msg = str(e.value)
    _one_line(msg)
    assert f"key '{key}'" in msg and "smoke.yaml" in msg, msg


def test_the_shipped_recipes_pass_every_value_check():
    for name in ("smoke", "two_stage", "two_stage_auto", "distill_effnet"):
        load_config(name)


# (cluster file body, the key the message must name; None: the message names the file only)
BAD_CLUSTERS = [
    ("gpu_tflops: 0\n", "gpu_tflops"),
    ("gpu_tflops: -989\n", "gpu_tflops"),
    ("gpu_tflops: .nan\n", "gpu_tflops"),
    ("gpu_memory_gb: 0\n", "gpu_memory_gb"),
    ("gpu_memory_gb: .inf\n", "gpu_memory_gb"),
    ("mem_per_task_gb: 0\n", "mem_per_task_gb"),
    ("threads_per_rank: 0\n", "threads_per_rank"),
    ("- kind: slurm\n", None),  # a list, not a mapping
    ("just a string\n", None),
]


@pytest.mark.parametrize("body, key", BAD_CLUSTERS)
def test_bad_cluster_file_is_one_line_naming_the_key_and_the_file(tmp_path, body, key):
    path = tmp_path / "cluster.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_cluster(str(path))
    msg = str(e.value)
    _one_line(msg)
    assert str(path) in msg
    assert f"key '{key}'" in msg if key else "must be a mapping" in msg


@pytest.mark.parametrize("data, needle", [
    (b"name: smoke\nstudent: {arch: vit_pico16}\n# caf\xe9 in latin-1\n", "line 3: the recipe file is not UTF-8"),
    (b"\xff\xfe\x00\x00", "line 1: the recipe file is not UTF-8"),
    (b"- a\n- b\n", "a recipe must be a mapping of sections, got a list"),
    (b"", "a recipe must be a mapping of sections, got an empty file"),
    (b"stages: [unclosed\n", "is not valid YAML"),
])
def test_unreadable_recipe_file_is_one_line_naming_the_file(tmp_path, data, needle):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    msg = str(e.value)
    _one_line(msg)
    assert msg.startswith(str(path)) and needle in msg, msg


def test_cluster_file_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_bytes(b"kind: slurm\npartition: gp\xfc\n")
    with pytest.raises(ConfigError) as e:
        load_cluster(str(path))
    _one_line(str(e.value))
    assert str(e.value).startswith(f"{path}: line 2: the cluster file is not UTF-8")


@pytest.mark.parametrize("ranks, world, key", [
    ((3, "auto"), 2, "stages.1.groups.0.ranks"),
    (("auto", 5), 4, "stages.1.groups.1.ranks"),
    ((8, 8), 2, "stages.1.groups.0.ranks"),  # fewer ranks than groups: was silently placed on the shared rank
])
def test_a_group_asking_for_more_ranks_than_the_world_is_a_plan_error(ranks, world, key):
    cfg = load_config("smoke", [f"stages.1.groups.{j}.ranks={r}" for j, r in enumerate(ranks)])
    with pytest.raises(ValueError) as e:
        make_plan(cfg, world, 1)
    msg = str(e.value)
    _one_line(msg)
    assert f"key '{key}'" in msg and f"world size {world}" in msg


def test_a_single_group_stage_asking_for_more_ranks_than_the_world_is_refused_too():
    cfg = load_config("smoke", ["stages.0.groups.0.ranks=4"])
    with pytest.raises(ValueError, match=r"key 'stages.0.groups.0.ranks' asks for 4 ranks.*world size 2"):
        make_plan(cfg, 2, 0)
    assert make_plan(load_config("smoke", ["stages.0.groups.0.ranks=1"]), 2, 0).groups[0].ranks == (0, 1)


# -- through the real command line -----------------------------------------------------------------------------


def launch(*args):
    return subprocess.run([sys.executable, "-m", "radio_scale.launchers.cli", *args], capture_output=True, text=True,
                          timeout=180)


def _exit_2_one_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("radio-launch: ")
    return lines[0]


@pytest.mark.parametrize("override, key", [
    ("student.patch_size=0", "student.patch_size"),
    ("optim.lr=nan", "optim.lr"),
    ("checkpoint.every=0", "checkpoint.every"),
    ("stages.1.groups.0.ranks=8", "stages.1.groups.0.ranks"),  # a plan error: world 2 on this machine
])
def test_cli_refuses_bad_values_with_exit_2_and_one_line_naming_key_and_file(override, key):
    line = _exit_2_one_line(launch("--recipe", "smoke", "--dry-run", override))
    assert f"key '{key}'" in line and "smoke.yaml" in line, line


def test_cli_plan_error_names_the_world_size():
    line = _exit_2_one_line(launch("--recipe", "smoke", "--dry-run", "stages.1.groups.0.ranks=8"))
    assert "world size 2" in line


@pytest.mark.parametrize("value", ["abc", "0", "-3", "1.5"])
def test_cli_nodes_that_is_not_a_positive_integer_is_one_line(value):
    line = _exit_2_one_line(launch("--recipe", "smoke", "--dry-run", "--nodes", value))
    assert line.startswith(f"radio-launch: --nodes must be a positive integer, got '{value}'"), line


def test_cli_non_utf8_recipe_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_bytes(b"name: x\n\xff\n")
    line = _exit_2_one_line(launch("--recipe", str(path), "--dry-run"))
    assert str(path) in line and "not UTF-8" in line
