"""Recipes load into typed configs; overrides apply; bad configs fail with one line naming key and file."""
import subprocess
import sys

import pytest

from radio_scale.config import ConfigError, config_to_yaml, load_config, recipe_names


def test_shipped_recipes_load_and_round_trip_through_yaml(tmp_path):
    assert {"smoke", "two_stage", "two_stage_auto"} <= set(recipe_names())
    for name in recipe_names():
        cfg = load_config(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(config_to_yaml(cfg))
        assert load_config(str(path)) == cfg


def test_two_stage_is_the_papers_recipe():
    cfg = load_config("two_stage")
    assert cfg.student.arch == "vit_h16" and cfg.optim.lr == 1e-3 and cfg.total_steps == 600_000
    s1, s2 = cfg.stages
    assert [g.resolution for g in s1.groups] == [256] and (s1.groups[0].batch_per_rank, s1.groups[0].ranks) == (16, 1.0)
    clip, sam = s2.groups
    assert (clip.resolution, clip.batch_per_rank, sam.resolution, sam.batch_per_rank) == (432, 32, 1024, 2)
    assert set(clip.teachers) == {"dfn_clip", "openai_clip", "dinov2"} and sam.teachers == ("sam",)
    assert cfg.teacher("sam").summary_weight == 0.0 and cfg.loss.alpha == 0.9 and cfg.loss.beta == 0.1


def test_dotted_overrides_reach_nested_keys_and_list_items():
    cfg = load_config("smoke", ["optim.lr=5e-4", "stages.1.groups.0.batch_per_rank=2", "teachers.clip.spatial_weight=0.5"])
    assert cfg.optim.lr == 5e-4
    assert cfg.stages[1].groups[0].batch_per_rank == 2
    assert cfg.teacher("clip").spatial_weight == 0.5


@pytest.mark.parametrize("override, needle", [
    (["student.bogus=1"], "unknown key 'student.bogus'"),
    (["optim.lr=fast"], "key 'optim.lr' must be float"),
    (["stages.0.groups.0.resolution=70"], "key 'stages.0.groups.0.resolution' is 70, not a multiple of the student patch size 16"),
    (["stages.0.groups.0.teachers=[clip, nope]"], "names undeclared teacher 'nope'"),
    (["teachers.effnet.checkpoint=null"], "key 'teachers.effnet.checkpoint' is not set"),
    (["stages.9.steps=3"], "'stages.9' is not an index"),
])
def test_bad_config_is_one_line_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("smoke", override)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    assert "smoke.yaml" in msg or msg.startswith("override key")


def test_missing_checkpoint_is_caught_when_files_are_checked():
    with pytest.raises(ConfigError, match=r"key 'teachers.dfn_clip.checkpoint': file not found: /checkpoints/dfn5b-clip-vit-h-14-378/"):
        load_config("two_stage", check_files=True)
    load_config("two_stage")  # a dry-run on a laptop needs no checkpoint files


def test_cli_bad_config_exits_2_with_one_line_and_no_traceback():
    r = subprocess.run([sys.executable, "-m", "radio_scale.launchers.cli", "--recipe", "smoke", "--dry-run",
                        "student.depthh=3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'student.depthh'" in lines[0] and "Traceback" not in r.stderr


def test_print_config_shows_the_resolved_config():
    r = subprocess.run([sys.executable, "-m", "radio_scale.launchers.cli", "--recipe", "two_stage", "--print-config",
                        "optim.lr=2e-4"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "lr: 0.0002" in r.stdout and "vit_h16" in r.stdout


def test_the_legacy_deepspeed_stage_key_of_earlier_run_configs_still_loads(tmp_path):
    """config.yaml files written by earlier versions (runs, exports) carry `deepspeed_stage`: it maps to
    deepspeed.zero_stage, so those models still load for evaluation."""
    import yaml

    from radio_scale.config.loader import recipe_path

    raw = yaml.safe_load(recipe_path("smoke").read_text())
    raw["deepspeed_stage"] = 1
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(str(path)).deepspeed.zero_stage == 1
